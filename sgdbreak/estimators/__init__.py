"""Pure estimators: matrix-free eigensolvers and traces (``linalg``), Hessian-vector
products and curvature (``hessian``), the gradient-noise spectrum (``noise``) and the
gradient samples it is computed from (``samples``). No model state, no optimizer.
"""
