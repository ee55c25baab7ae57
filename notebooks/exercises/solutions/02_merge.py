# Reference solution of exercise 2 (the precision-weighted merge). Teachers: delete the
# solutions/ folder from the students' copy.


def merge_forward(mu_hat, var_hat, mu_p, var_p):
    """The Gaussian proportional to N(mu_hat, var_hat) N(mu_p, var_p): (mu_q, var_q)."""
    # 1/var_q = 1/var_hat + 1/var_p, written with one division: finite for 1e-8 .. 1e8
    s = 1 / (var_hat + var_p)
    var_q = var_hat * var_p * s
    mu_q = (mu_hat * var_p + mu_p * var_hat) * s
    return mu_q, var_q


def merge_backward(g_mu, g_var, mu_hat, var_hat, mu_p, var_p):
    """Gradients for (mu_hat, var_hat, mu_p, var_p) given g_mu = dL/dmu_q, g_var = dL/dvar_q."""
    s = 1 / (var_hat + var_p)
    s2 = s * s
    diff = mu_p - mu_hat
    # mu_q = (mu_hat var_p + mu_p var_hat) s,  var_q = var_hat var_p s
    d_mu_hat = g_mu * var_p * s
    d_var_hat = g_mu * var_p * diff * s2 + g_var * var_p * var_p * s2
    d_mu_p = g_mu * var_hat * s
    d_var_p = -g_mu * var_hat * diff * s2 + g_var * var_hat * var_hat * s2
    return d_mu_hat, d_var_hat, d_mu_p, d_var_p
