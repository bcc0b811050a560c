"""protheus-license: counted, leased licenses (seed 002) and the client the HTTP units use."""
