package transport

// MaxTickets is the bound on a TicketCache's entries.
const MaxTickets = maxTickets
