// placeholder: the client module arrives with the JS client
