"""Deployment: a trained model or adapter made usable outside training. GGUF export (and the command
line for import and export, `python -m deploy.gguf`), the adapter alone as llama.cpp's LoRA GGUF
(`python -m deploy.adapter_gguf`), Ollama Modelfiles, and the reply to a chat that chat.py and the
demo print. It imports model, lora and data, never training."""
