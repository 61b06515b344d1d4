"""Interop: a trained model in the tools people already use.

- :mod:`iwm.interop.export`: the encoder for ``timm.create_model``, the whole model as
  ``config.json`` + ``model.safetensors`` (Hugging Face layout; ``iwm export``);
- :mod:`iwm.interop.embed`: features of image files to ``.npy`` / ``.parquet`` (``iwm embed``);
- :mod:`iwm.interop.images`: image files as a model's input (``model.load_images``);
- :mod:`iwm.interop.hub`: the ``torch.hub`` entry points of ``hubconf.py``.
"""
