"""The pieces the GPT of ``model.py`` is built from, one concern a module: attention masks,
rotary embedding with YaRN, attention, the MLP, embeddings and residual routing."""
