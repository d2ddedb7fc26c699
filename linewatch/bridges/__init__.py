"""Bridges from the verdict stream to the plant: OPC UA (PLC, reject gate) and MQTT (MES).

A separate process (``linewatch bridge``) that subscribes like any client; only the CLI imports this package.
"""
