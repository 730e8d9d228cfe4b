"""One request's steering, from the HTTP body to the workers and back, as named types.

schema.py   the `steering` field (pydantic): SteeringSpec, parse_spec, SpecError
resolve.py  SteeringSpec + Catalog (what the server loaded) + policy -> ResolvedOps
plan.py     plan_request: SteeringSpec + Catalog + config + the endpoint's facts -> PlannedRequest (ops, observation,
            cost); the one planning step of the server, compare's default variant and offline steering_args
ops.py      ResolvedOp and its parts (coefficients, position rule, condition, inline vector), checked by name
wire.py     RequestPlan (ops, observation, salt): one signed message in SamplingParams.extra_args[WIRE_KEY]
records.py  TokenRecord: what the workers report per observed token, read back by the API process
"""
