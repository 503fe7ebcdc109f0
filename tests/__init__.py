"""mxq's test suite (a package, so conftest can register tests.fixtures_infra)."""
