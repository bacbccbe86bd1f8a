"""One VM, one process (issue 11): the VM process and the VMM protocol.

- ``protocol``: the versioned, sans-IO codec both ends share (``protocol/vmm.md``).
- ``channel``: the blocking transport (frames plus SCM_RIGHTS fds) over a Unix socket.
- ``process``: the VM process (``squibd --vm-process``): owns KVM and the vCPU threads.
- ``zygote``: a warm, pre-imported process that forks one VM process per VM.

The daemon side is ``squibd.vm.remote`` (``RemoteVm``).
"""
