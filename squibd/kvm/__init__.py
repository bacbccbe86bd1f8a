"""squibd.kvm"""
