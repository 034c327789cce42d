"""`lj.apply`: the jaxpr interpreter that runs a function with adapters in low-rank form."""
