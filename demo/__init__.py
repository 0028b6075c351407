"""`rotor demo`: a whole world on one machine, for seeing a rotation, never for production.

An embedded PostgreSQL (the `pgserver` wheel), moto's AWS, a Kubernetes API that plays
External Secrets, Reloader and the Deployment controller (`demo.kube_api`), a sample app whose
pods keep logging in, and a web page that plays Slack (`demo.slack_api`, `demo.page`). The
tests use the same fakes.
"""
