"""Research systems on the product's footing: `bk` (the causal BK core model) and `megacontext`
(gists of a long context read by a frozen base). They use the product's public functions; the product
never imports them (tests/test_imports.py)."""
