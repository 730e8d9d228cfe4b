"""The API server process: the middleware, its view of the engine's workers, and the `steer-serve` launcher."""
