"""Captions and their encoders: templated captions for class-labelled images, the text encoders
(CLIP's text tower, T5, a sentence encoder) behind one interface, and the offline MiniLM copy."""
