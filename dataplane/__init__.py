"""weft dataplane: packets in, packets out. Never imports control."""
