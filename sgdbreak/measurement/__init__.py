"""Measuring a run: the ``probe`` (the fixed examples measured on), ``quantities`` (what is
measured), ``triggers`` (when), the ``monitor`` (the one stateful object) and the
break-even ``breakeven`` detector.
"""
