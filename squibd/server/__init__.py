"""squibd.server"""
