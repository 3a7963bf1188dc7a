"""Integrations with other trainers. Import the one you use (decpo.integrations.trl);
importing decpo never imports them."""
