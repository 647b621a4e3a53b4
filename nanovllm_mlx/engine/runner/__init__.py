"""A plan on the device: the KV pools, a batch turned into arrays, the model call (eager or
compiled) and sampling, failures isolated; the step budget and the pool's size, measured
and sized at start-up."""
