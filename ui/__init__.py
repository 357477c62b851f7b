"""Front ends: the command line and (later) the Gradio app."""
