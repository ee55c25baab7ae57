# Reference solution of exercise 6 (the reparameterisation trick). Teachers: delete the
# solutions/ folder from the students' copy.
from autograd import get_array_module, record, sum_to


def reparameterize(mu, var, eps):
    """A sample z = mu + sqrt(var) * eps of N(mu, var); eps ~ N(0, I) is an array."""
    xp = get_array_module(mu.data)
    std = xp.sqrt(var.data)
    z = mu.data + std * eps

    def backward(g):
        # dz/dmu = 1, dz/dvar = eps / (2 std); sum over axes that broadcasting added
        return sum_to(g, mu.shape), sum_to(g * eps * 0.5 / std, var.shape)
    return record(z, (mu, var), backward)
