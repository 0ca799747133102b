"""A model as input: the handle a stage takes and returns, loading a checkpoint (a folder, a hub
cache, an installed package, a GGUF file), its files, its weights read without torch, its memory
needs, and the export route its architecture predicts."""
