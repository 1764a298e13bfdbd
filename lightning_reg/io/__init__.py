"""The loading layer's leaf: every read of a file we do not trust, and every atomic write (``docs/architecture.md``).

It imports nothing of the project but ``errors``: ``files`` (torch files, state dicts, npz, atomic writes),
``pretrained`` (third-party pretrained folders, vetted, then loaded offline), ``vae`` (the Stable Diffusion VAE),
``edm2_pickle`` (the official EDM2 snapshots), ``edm2`` (their safetensors form; either form read). Model formats
built on these readers live in ``lightning_reg.sources``. Import the module you need (``lightning_reg.io.files``,
...): the package imports none of them, so reading a YAML config (``yaml_budget``) does not load torch.
"""
