"""Inference: text and a voice in, audio chunks out.

`model` holds the model class with one method per mode (it turns a request into model inputs),
`synthesis` runs one utterance through LLM -> flow -> vocoder on the streaming schedule.
"""
