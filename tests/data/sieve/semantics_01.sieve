require ["reject","vacation"]; vacation "x"; reject "no";
