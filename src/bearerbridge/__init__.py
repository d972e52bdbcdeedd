"""bearerbridge: an OAuth 2.0 authorization server and SASL authority for non-HTTP protocols."""
