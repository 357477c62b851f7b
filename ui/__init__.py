"""Front ends: the command line, the demo and the Gradio app."""
