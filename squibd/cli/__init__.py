"""squibd.cli"""
