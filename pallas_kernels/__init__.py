"""Attention kernels of jaxinfer, each beside a plain-jnp reference it is tested against."""
