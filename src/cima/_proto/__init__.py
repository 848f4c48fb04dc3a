"""Code generated from protocol definitions (see each subpackage's README); not edited by hand."""
