# Reference solution of exercise 4 (batch norm backward). Teachers: delete the solutions/
# folder from the students' copy.
from autograd import get_array_module, record


def batch_norm(x, gamma, beta, eps):
    """Training-mode batch norm of a 2-D x (rows = examples) as one autograd op."""
    xp = get_array_module(x.data)
    n = x.shape[0]
    mean = x.data.mean(axis=0)
    centred = x.data - mean
    var = (centred * centred).mean(axis=0)
    inv_std = 1 / xp.sqrt(var + eps)
    xhat = centred * inv_std
    out = gamma.data * xhat + beta.data

    def backward(g):
        dbeta = g.sum(axis=0)
        dgamma = (g * xhat).sum(axis=0)
        # g_xhat = g * gamma; through mean and var every row moves every xhat:
        # dx = gamma inv_std (g - mean(g) - xhat * mean(g * xhat))
        dx = gamma.data * inv_std * (g - dbeta / n - xhat * dgamma / n)
        return dx, dgamma, dbeta
    return record(out, (x, gamma, beta), backward)
