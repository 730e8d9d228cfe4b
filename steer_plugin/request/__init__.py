"""One request's steering, from the HTTP body to the workers and back, as named types.

schema.py   the `steering` field (pydantic): SteeringSpec, parse_spec, SpecError
resolve.py  SteeringSpec + Catalog (what the server loaded) + policy -> ResolvedOps
wire.py     RequestPlan (ops, observation, salt): one signed message in SamplingParams.extra_args[WIRE_KEY]
records.py  TokenRecord: what the workers report per observed token, read back by the API process
"""
