"""The sparse solvers: the non-negative lasso of the targets (restarted FISTA with an active-set finish, or the
reference FISTA-100), the small non-negative least squares it uses, the online dictionary learner, and how
their CPU work is split into threads."""
