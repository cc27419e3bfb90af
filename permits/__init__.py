"""Data permits issued by health data access bodies (EHDS Art 68): models, service and API."""
