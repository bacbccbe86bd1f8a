"""squibd.api"""
