import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_ltc.models import patch


def doubled(self, base_call, x):
    return 2 * base_call(self, x)


def shifted(self, base_call, x):
    return base_call(self, x) + self.shift


def test_a_patch_wraps_one_instance_once_and_declares_its_attributes():
    mx.random.seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.update(a.parameters())
    x = mx.ones((1, 3))
    names = [k for k, _ in tree_flatten(a.parameters())]
    assert patch.install(a, "doubled", doubled)
    assert not patch.install(a, "doubled", doubled)  # installed already: nothing changes
    assert mx.allclose(a(x), 2 * b(x)).item() and type(b) is nn.Linear  # the other instance is untouched
    assert patch.install(a, "shifted", shifted, shift=1.5)
    assert mx.allclose(a(x), 2 * b(x) + 1.5).item()  # the newer patch wraps the older one
    assert patch.installed(a) == ("doubled", "shifted") and patch.declared(a) == {"shift": "shifted"}
    assert isinstance(a, nn.Linear) and [k for k, _ in tree_flatten(a.parameters())] == names
    assert patch.attribute(a, "shift") == 1.5
    b.window = 4  # an attribute no patch declared is not a patch's contract
    assert patch.attribute(b, "window") is None and patch.attribute(b, "window", 0) == 0
