"""squibd.rpc"""
