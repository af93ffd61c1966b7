"""Frontend: what the model stages are fed.

`text` normalises and splits text (ttsfrd or wetext), `tokenizer` turns it into Qwen ids,
`audio` loads and resamples prompt audio, `features` computes the log-mel and fbank features,
and `speech_models` runs the ONNX speech tokenizer and speaker encoder on them.
"""
