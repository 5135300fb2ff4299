"""The config layer's torch-free parts: schemas derived from signatures, domain rules, enumerated choices."""
