"""Models in and out through the Hugging Face format: a torchrig model as a transformers model directory, and
transformers' directories (ours or anyone's) as torchrig weights and configs.

- mapping.py: `HFMapping`, what a model family registers on its ModelSpec (`hf=`): the model types it
  reads, its config.json both ways, its state dict both ways. deepseek.py and llama.py are the two families'.
- directory.py: reading an HF directory (config.json, safetensors single or sharded, torchrig.json) into a
  torchrig state dict and config tree, and writing one (train/export.py); tokenizer_files.py the tokenizer
  files transformers needs; shards.py the safetensors files and their index; files.py the few file operations
  (bounded JSON reads, copies, publishing a directory, the memory check) that every reader and writer uses.

Nothing here runs code from a checkpoint: only JSON and safetensors are read. transformers itself is never
imported (the tests compare against it).
"""
