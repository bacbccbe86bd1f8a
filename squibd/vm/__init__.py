"""squibd.vm"""
