"""The Kubernetes scaler: a Deployment's or StatefulSet's ``/scale`` sets how many AppServer pods
run; the Service's EndpointSlices say which are ready; those join the unit's pool."""
