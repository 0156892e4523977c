"""Media input: safe fetching, image and video preprocessing, chat template, M-RoPE positions."""
