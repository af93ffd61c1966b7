"""Loading: an official model directory, read once, into our modules.

`config` parses the yaml's hyperpyyaml tags into plain records, `registry` maps the upstream
class paths written there to our classes, and `model_dir` checks the directory, recognises the
model generation and loads each stage's checkpoint with strict key matching.
"""
