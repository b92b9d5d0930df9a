"""Inter-facility exchange: the provincial PKI and signed packages (`trust`), reliable store-and-forward
delivery (`delivery`, `transport`) and their tables (`schema`). A domain package: it never imports the API
layer or a web framework; only `transport` uses an HTTP client."""
