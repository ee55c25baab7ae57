# Reference solution of exercise 3 (the analytic Gaussian KL). Teachers: delete the
# solutions/ folder from the students' copy.
from autograd import get_array_module


def kl_forward(mu_q, var_q, mu_p, var_p):
    """KL( N(mu_q, var_q) || N(mu_p, var_p) ) per element."""
    xp = get_array_module(mu_q)
    diff = mu_q - mu_p
    return 0.5 * (xp.log(var_p) - xp.log(var_q) + (var_q + diff * diff) / var_p - 1)


def kl_backward(g, mu_q, var_q, mu_p, var_p):
    """Gradients for (mu_q, var_q, mu_p, var_p) given g = dL/dKL (same shape)."""
    diff = mu_q - mu_p
    d_mu_q = g * diff / var_p
    d_var_q = 0.5 * g * (1 / var_p - 1 / var_q)
    d_mu_p = -d_mu_q
    d_var_p = 0.5 * g * (1 / var_p - (var_q + diff * diff) / (var_p * var_p))
    return d_mu_q, d_var_q, d_mu_p, d_var_p
