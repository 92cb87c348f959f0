"""weft control plane: leases in etcd, watched peers, device programming, CLI."""
