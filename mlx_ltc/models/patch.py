"""The one way mlx-ltc changes what a module of a loaded mlx-lm model computes, without forking mlx-lm.

`install` gives one module instance a subclass whose `__call__` wraps the one before it, so module paths
(and adapter names) stay mlx-lm's and other instances of the class are untouched. A patch is installed
at most once per module (installing it again does nothing), and the instance attributes it relies on
are set with it and declared on the class (`declared`), so a reader such as the memory engine asks for
`attribute(attn, "window")` instead of guessing which patch set what. Patches in use:

- `efficient` (train.engine): full-sequence causal attention through the O(L) kernel;
- `checkpointed` (train.update): each block recomputed in the backward pass;
- `windowed` and `activation` (models.faithful): StarCoder2's sliding window (attribute `window`) and
  its configured GELU;
- `positioned` (research.megacontext.positions): RoPE at explicit per-token positions (attribute
  `positions`, None outside `at_positions`).
"""

_PATCHES, _ATTRIBUTES = "_mlx_ltc_patches", "_mlx_ltc_attributes"


def installed(module) -> tuple:
    return getattr(type(module), _PATCHES, ())


def declared(module) -> dict:
    """{attribute: the patch that declared it} of the module's patches."""
    return dict(getattr(type(module), _ATTRIBUTES, {}))


def attribute(module, name: str, default=None):
    """An attribute a patch of this module declared, else `default` (also when no patch declared it)."""
    return getattr(module, name, default) if name in declared(module) else default


def install(module, name: str, call, **attributes) -> bool:
    """Wrap `module`'s __call__ with `call(self, base_call, *args, **kwargs)`, where base_call(self, ...) is the
    call it replaces; set `attributes` on the instance. False (and nothing changed) when `name` is installed."""
    if name in installed(module):
        return False
    base = type(module)
    base_call = base.__call__

    def __call__(self, *args, **kwargs):
        return call(self, base_call, *args, **kwargs)

    namespace = {
        "__call__": __call__,
        _PATCHES: (*installed(module), name),
        _ATTRIBUTES: {**declared(module), **{a: name for a in attributes}},
    }
    module.__class__ = type(f"{base.__name__}_{name}", (base,), namespace)
    for key, value in attributes.items():
        setattr(module, key, value)
    return True
