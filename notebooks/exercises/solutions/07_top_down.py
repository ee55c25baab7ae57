# Reference solution of exercise 7 (the LVAE's top-down pass).
# Teachers: delete the solutions/ folder from the students' copy.
from gaussian import gaussian_kl, merge


def top_down(model, up, sample):
    """The LVAE's stochastic top-down pass; returns (z, mu_q, var_q, kl), bottom first."""
    n = model.n_layers
    z, mu_q, var_q, kl = [None] * n, [None] * n, [None] * n, [None] * n
    top = n - 1
    mu_q[top], var_q[top] = up[top]  # q(z_L | x) is the bottom-up Gaussian itself
    z[top] = sample(mu_q[top], var_q[top])
    kl[top] = gaussian_kl(mu_q[top], var_q[top], 0.0, 1.0)
    for i in range(top - 1, -1, -1):
        mu_p, var_p = model.prior(i, z[i + 1])  # p(z_i | z_i+1), from the sample above
        mu_q[i], var_q[i] = merge(up[i][0], up[i][1], mu_p, var_p)
        z[i] = sample(mu_q[i], var_q[i])
        kl[i] = gaussian_kl(mu_q[i], var_q[i], mu_p, var_p)
    return z, mu_q, var_q, kl
