"""Plain modules that tests import (photos drawn in code, training helpers, loopback services, tracker readers);
fixtures stay in the conftest files."""
