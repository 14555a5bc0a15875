"""The local Gradio demo (app.py)."""
